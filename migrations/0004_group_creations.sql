-- What CHATD_GROUPS_PER_DAY counts: each group a user created, for a day, even when the
-- group was deleted since (so deleting does not make room for more). chatd prunes a
-- user's rows older than a day whenever that user creates a group.
-- depends: 0003_normalize_emails

CREATE TABLE group_creations (
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX group_creations_user_idx ON group_creations (user_id, created_at);
