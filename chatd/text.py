"""Normalizing what users type: email addresses, and text that only looks empty."""

from __future__ import annotations

import unicodedata

MAX_EMAIL_CHARS = 254  # RFC 5321's limit on a path, and the bound of every email key

# --- invisible characters ------------------------------------------------------------------
#
# "Invisible" is what renders as nothing, or as blank space, on its own:
# - the general categories Cc (controls), Cf (format: zero-width space, ZWJ/ZWNJ, bidi
#   marks and overrides, the BOM, tags), Zs/Zl/Zp (spaces, line and paragraph separators);
# - Unicode's Default_Ignorable_Code_Point property (DerivedCoreProperties.txt), which adds
#   characters that are not in those categories but that renderers skip: the Hangul
#   fillers (U+115F, U+1160, U+3164, U+FFA0, letters by category), the combining grapheme
#   joiner, variation selectors, and the reserved ranges kept for more of the same;
# - U+2800 BRAILLE PATTERN BLANK, a symbol by category but drawn as an empty cell: the
#   usual way to post a "blank" message where zero-width characters are refused;
# but not the Prepended_Concatenation_Mark characters (Arabic number signs, the end of
# ayah, ...): format characters by category, they are drawn as visible signs.
# Visible text may contain any of these (ZWJ builds emoji, bidi marks belong to Arabic and
# Hebrew text): only text made of nothing else counts as empty.

_BLANK_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})
_DEFAULT_IGNORABLE = (  # Default_Ignorable_Code_Point, Unicode 15.1
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x061C, 0x061C),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)
_RENDERED_BLANK = frozenset({"\u2800"})
_VISIBLE_FORMAT = frozenset(  # Prepended_Concatenation_Mark, Unicode 15.1
    "\u0600\u0601\u0602\u0603\u0604\u0605\u06dd\u070f\u0890\u0891\u08e2\U000110bd\U000110cd"
)


def is_invisible(char: str) -> bool:
    """Whether one character renders as nothing or as blank space (see above)."""
    if "!" <= char <= "~":  # printable ASCII: most text's first character, decided at once
        return False
    if char.isspace() or char in _RENDERED_BLANK:
        return True
    if unicodedata.category(char) in _BLANK_CATEGORIES:
        return char not in _VISIBLE_FORMAT
    code = ord(char)
    return any(low <= code <= high for low, high in _DEFAULT_IGNORABLE)


def looks_empty(text: str) -> bool:
    """Whether `text` shows nothing: empty, or made only of invisible characters."""
    return all(map(is_invisible, text))


# --- email addresses -----------------------------------------------------------------------


class InvalidEmail(ValueError):
    """Not an address chatd accepts; str() says why, for the client."""


def normalize_email(raw: str) -> str:
    """The one stored form of an address, or InvalidEmail.

    Surrounding whitespace is dropped; an address with an invisible or control character
    left in it is refused. email-validator (no DNS) checks the syntax, NFC-normalizes it
    and maps the domain per UTS #46 (case-folded), which is then stored IDNA-encoded
    (`bücher.de` -> `xn--bcher-kva.de`), so every spelling of a domain is one key. The
    local part is lower-cased, as chatd always stored addresses: `Alice@x.com` and
    `alice@x.com` stay one account, though RFC 5321 lets a mail server tell them apart.
    """
    value = raw.strip()
    if any(map(is_invisible, value)):
        raise InvalidEmail("email must not contain invisible or control characters")
    if len(value) > MAX_EMAIL_CHARS:
        raise InvalidEmail(f"email must be at most {MAX_EMAIL_CHARS} characters")
    # Imported here: chatd.protocol imports this module, and the bot SDK (sdk/, without the
    # server's dependencies) imports chatd.protocol but never checks an email.
    from email_validator import EmailNotValidError, validate_email

    try:
        parsed = validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        raise InvalidEmail(f"email is not a valid address: {exc}") from None
    email = f"{parsed.local_part.lower()}@{parsed.ascii_domain}"
    if len(email) > MAX_EMAIL_CHARS:  # IDNA encoding lengthens a domain
        raise InvalidEmail(f"email must be at most {MAX_EMAIL_CHARS} characters")
    return email


def email_key(raw: str) -> str:
    """The key to look an account up by (login, search), for any input; InvalidEmail
    only for an address too long or with invisible or control characters (no account
    has one).

    An address normalize_email refuses may still belong to an account registered under
    the older, looser check (e.g. `bob@corp.local`, a reserved domain): it is looked up as
    that check stored it, trimmed and lower-cased (and NFC, as migration 0003 left it).
    """
    try:
        return normalize_email(raw)
    except InvalidEmail:
        value = unicodedata.normalize("NFC", raw.strip().lower())
        if len(value) > MAX_EMAIL_CHARS or any(map(is_invisible, value)):
            raise
        return value
