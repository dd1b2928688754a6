-- Presence, message search and notifications (issue #17).
-- depends: 0009_bots

-- Search: full text over messages' current text, in the 'russian' configuration (Cyrillic
-- words through the Russian Snowball stemmer, Latin words through the English one: see
-- docs/protocol.md, "Search"). A stored column rather than an index on the expression:
-- search walks a chat's newest messages testing each (chatd/handlers/search.py), and a
-- stored tsvector tests in about a microsecond where recomputing it costs ten. The price:
-- this statement rewrites the messages table once (docs/operations.md), and each row
-- holds its tsvector. An edit recomputes it; tombstones (deleted for everyone, text '')
-- are left out of the partial index.
ALTER TABLE messages
    ADD COLUMN search tsvector GENERATED ALWAYS AS (to_tsvector('russian'::regconfig, text)) STORED;
CREATE INDEX messages_search_idx ON messages USING gin (search) WHERE NOT deleted;

-- Presence: whether others may see it, and when the user was last online (written when
-- their last socket closes, after the grace period; Redis or the process's memory hold
-- who is online right now).
ALTER TABLE users
    ADD COLUMN share_presence boolean NOT NULL DEFAULT true,
    ADD COLUMN last_seen_at timestamptz;

-- Notifications, per member and chat: muted until a time (NULL: not muted), and which
-- messages notify at all. notified_seq: the push notifier's pointer; messages up to it
-- have been considered for this member's pushes (sent, or skipped because the member was
-- online, muted, or had read them).
ALTER TABLE chat_members
    ADD COLUMN mute_until timestamptz,
    ADD COLUMN notify text NOT NULL DEFAULT 'all' CHECK (notify IN ('all', 'mentions', 'none')),
    ADD COLUMN notified_seq bigint NOT NULL DEFAULT 0;
-- What was sent before this release is not news: nobody is notified of it.
UPDATE chat_members cm SET notified_seq = c.last_seq FROM chats c WHERE c.id = cm.chat_id;

-- A browser's Web Push subscription (PushSubscription.toJSON()). One row per endpoint: the
-- same browser subscribing again (or for another user, after a logout and login) takes it
-- over.
CREATE TABLE push_subscriptions (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    endpoint   text NOT NULL UNIQUE,
    p256dh     text NOT NULL,                 -- the browser's ECDH public key (base64url)
    auth       text NOT NULL,                 -- its auth secret (base64url)
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX push_subscriptions_user_idx ON push_subscriptions (user_id);
