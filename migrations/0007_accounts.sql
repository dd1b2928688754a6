-- Accounts after day one: sessions (one per login) that can be revoked, blocks between
-- users, the server role and disabled or deleted accounts.
-- depends: 0006_files

-- A session is one login: its refresh tokens are one family (refresh_tokens.family_id is
-- the session's id), and its access tokens carry its id (the `sid` claim). Revoking it
-- stamps revoked_at: from then on its refresh tokens and access tokens are refused.
CREATE TABLE sessions (
    id           uuid PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    device       text NOT NULL,                 -- given at login, else from the User-Agent
    ip           text NOT NULL,                 -- the client's address at login
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),  -- login, refresh, first use per process
    revoked_at   timestamptz
);
CREATE INDEX sessions_user_idx ON sessions (user_id, created_at);

-- Logins made before sessions existed: each refresh token family becomes a session, so
-- their refresh tokens keep working (and can now be revoked).
INSERT INTO sessions (id, user_id, device, ip)
SELECT family_id, (array_agg(user_id))[1], 'unknown device', 'unknown'
FROM refresh_tokens GROUP BY family_id;

ALTER TABLE refresh_tokens
    ADD CONSTRAINT refresh_tokens_session_fk
    FOREIGN KEY (family_id) REFERENCES sessions (id) ON DELETE CASCADE;

-- blocker has blocked blocked: blocked cannot open a private chat with blocker, send in
-- their private chat, or add them to a group; blocked's group messages are flagged for
-- blocker's client.
CREATE TABLE blocks (
    blocker_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    blocked_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (blocker_id, blocked_id),
    CHECK (blocker_id <> blocked_id)
);
CREATE INDEX blocks_blocked_idx ON blocks (blocked_id, blocker_id);

-- DELETE /me: the row stays (messages kept under CHATD_DELETED_USER_MESSAGES=keep still
-- name a sender), but its profile is erased: name "Deleted account", a placeholder email
-- (the address is free again), no password.
ALTER TABLE users ADD COLUMN deleted_at timestamptz;

-- A user's own messages, in order: GET /me/export's pages and erasing them on deletion.
CREATE INDEX messages_sender_idx ON messages (sender_id, id);

-- Administration: the server role, disabled accounts, reports and the audit log.
ALTER TABLE users
    ADD COLUMN role text NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    ADD COLUMN disabled_at timestamptz;     -- set: no login, every session revoked

-- A user reports a message of a chat they are in; once per message and reporter.
CREATE TABLE reports (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id  bigint NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    reporter_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (message_id, reporter_id)
);

-- Every admin action, by whom (NULL: the `chatd admin` command), on what.
CREATE TABLE audit_log (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    actor_id   uuid REFERENCES users (id) ON DELETE SET NULL,
    action     text NOT NULL,
    target     text NOT NULL,
    details    jsonb NOT NULL DEFAULT '{}'
);
