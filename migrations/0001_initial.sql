-- chatd's first schema: users, refresh tokens, chats, members with read pointers, messages.
-- depends:

CREATE TABLE users (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name          text NOT NULL,
    email         text NOT NULL UNIQUE,          -- stored lower-cased
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
-- users_list: ordered by (name, id), searched by name or email prefix.
CREATE INDEX users_name_idx ON users (name, id);
CREATE INDEX users_lower_name_prefix_idx ON users (lower(name) text_pattern_ops);
CREATE INDEX users_email_prefix_idx ON users (email text_pattern_ops);

-- A refresh token is spent once: used_at is set on use; a second use revokes its family.
CREATE TABLE refresh_tokens (
    token_hash bytea PRIMARY KEY,                -- sha256 of the token; the token itself is never stored
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    family_id  uuid NOT NULL,                    -- every token refreshed from one login
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);
CREATE INDEX refresh_tokens_family_idx ON refresh_tokens (family_id);

CREATE TABLE chats (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    type        text NOT NULL CHECK (type IN ('private', 'group')),
    name        text,
    -- "<smaller uuid>:<larger uuid>" for private chats: one chat per pair, race-free.
    private_key text UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- seq of the newest message; incremented under the row lock, so seq order = commit order.
    last_seq    bigint NOT NULL DEFAULT 0,
    -- every message with seq <= read_seq has been read by all members but its sender.
    read_seq    bigint NOT NULL DEFAULT 0,
    CHECK ((type = 'private') = (private_key IS NOT NULL))
);

CREATE TABLE chat_members (
    chat_id   bigint NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    user_id   uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- the member's read pointer, as a seq: unread = chats.last_seq - read_seq, no COUNT needed.
    read_seq  bigint NOT NULL DEFAULT 0,
    joined_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (chat_id, user_id)
);
CREATE INDEX chat_members_user_idx ON chat_members (user_id, chat_id);
-- min(read_seq) per chat in one index probe, whatever the group size.
CREATE INDEX chat_members_read_idx ON chat_members (chat_id, read_seq);

CREATE TABLE messages (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chat_id       bigint NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    seq           bigint NOT NULL,
    sender_id     uuid NOT NULL REFERENCES users (id),
    text          text NOT NULL,
    client_msg_id text,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (chat_id, seq),
    UNIQUE (sender_id, client_msg_id)
);
