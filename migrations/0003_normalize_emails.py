"""Stored emails in the form chatd.text.normalize_email gives new ones.

Before, an address was stored trimmed and lower-cased. Those that are plain ASCII already
have their normal form; the others get it (NFC, the domain IDNA-encoded), so their owners
log in with any spelling and nobody can register the same address again in another
spelling. An address the new check refuses keeps its old form, made NFC (login looks it
up that way). Two old rows with one normal form (one address registered in two
spellings): the older account takes it, the other keeps its old form and is logged.

The email prefix index goes: users_list matches an email only whole (the UNIQUE index).
"""

import logging
import unicodedata

from yoyo import step

__depends__ = {"0002_chat_model"}

log = logging.getLogger("chatd")


def normalize_stored_emails(conn):
    from chatd.text import InvalidEmail, normalize_email

    cursor = conn.cursor()
    cursor.execute(
        "SELECT id, email FROM users WHERE octet_length(email) <> char_length(email)"
        " ORDER BY created_at, id"
    )
    for user_id, email in cursor.fetchall():
        try:
            normal = normalize_email(email)
        except InvalidEmail:
            normal = unicodedata.normalize("NFC", email)
        if normal == email:
            continue
        cursor.execute(
            "UPDATE users SET email = %s WHERE id = %s"
            " AND NOT EXISTS (SELECT 1 FROM users WHERE email = %s)",
            (normal, user_id, normal),
        )
        if cursor.rowcount == 0:
            log.warning(
                "migration 0003: user %s keeps its email as it was: its normal form"
                " is another (older) account's",
                user_id,
            )


steps = [
    step(normalize_stored_emails),
    step(
        "DROP INDEX IF EXISTS users_email_prefix_idx",
        "CREATE INDEX users_email_prefix_idx ON users (email text_pattern_ops)",
    ),
]
