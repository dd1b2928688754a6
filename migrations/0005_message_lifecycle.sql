-- Messages that change: edits, deletes, replies, mentions, forwards, reactions, pins, and
-- the per-chat version that orders every change (sync replays them from it).
-- depends: 0004_group_creations

-- version: the chat's change counter, bumped under the chats row lock by every new,
-- edited, deleted (for everyone) or reacted message and every pin, so it is gapless and in
-- commit order like last_seq. Messages stored before it existed stay at version 0.
ALTER TABLE chats
    ADD COLUMN version bigint NOT NULL DEFAULT 0,
    ADD COLUMN pinned_message_id bigint;

ALTER TABLE messages
    ADD COLUMN version bigint NOT NULL DEFAULT 0,   -- the chat's version at its last change
    ADD COLUMN changed boolean NOT NULL DEFAULT false,  -- edited, deleted or reacted since sent
    ADD COLUMN edited_at timestamptz,
    ADD COLUMN deleted boolean NOT NULL DEFAULT false,  -- for everyone: text '' and no extras
    ADD COLUMN reply_to bigint,
    ADD COLUMN mentions uuid[],                     -- NULL: none
    ADD COLUMN forwarded_from jsonb,                -- {"sender_uuid", "sender_name", "timestamp"}
    -- The wire's reactions list, rebuilt from message_reactions on each change, so reading
    -- a message never aggregates. NULL: none.
    ADD COLUMN reactions jsonb;
-- sync: the messages of a chat changed since a version. Only changed messages are in it:
-- a message a client holds (seq <= its seq) was sent at or before its version, so only a
-- change can put it above; and a send adds no entry, which keeps sends as cheap as before.
-- seq is a key column so the "held by the client" test (seq <= its seq) reads no table row.
CREATE INDEX messages_changed_idx ON messages (chat_id, version, seq) WHERE changed;
-- unread counts subtract the deleted messages above a read pointer: few, found directly.
CREATE INDEX messages_deleted_idx ON messages (chat_id, seq) WHERE deleted;

-- The texts a message had before each edit (a delete for everyone erases them).
CREATE TABLE message_edits (
    message_id bigint NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    text       text NOT NULL,
    written_at timestamptz NOT NULL,                 -- when this text was sent or edited in
    replaced_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX message_edits_message_idx ON message_edits (message_id, replaced_at);

CREATE TABLE message_reactions (
    message_id bigint NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    emoji      text NOT NULL,
    user_id    uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (message_id, emoji, user_id)
);

-- Who each message mentions, by (chat, seq): unread_mentions counts the rows above a
-- member's read pointer. Rows go with the chat, or with a delete for everyone.
CREATE TABLE mentions (
    user_id    uuid NOT NULL,
    chat_id    bigint NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    seq        bigint NOT NULL,
    PRIMARY KEY (user_id, chat_id, seq)
);
CREATE INDEX mentions_chat_idx ON mentions (chat_id, seq);

-- Messages a member deleted for themselves. version: the chat's version when hidden, so
-- sync can tell which hides a client has not heard of.
CREATE TABLE hidden_messages (
    user_id    uuid NOT NULL,
    chat_id    bigint NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    seq        bigint NOT NULL,
    message_id bigint NOT NULL,
    version    bigint NOT NULL,
    PRIMARY KEY (user_id, chat_id, seq)
);
CREATE INDEX hidden_messages_version_idx ON hidden_messages (user_id, chat_id, version);
CREATE INDEX hidden_messages_chat_idx ON hidden_messages (chat_id);
