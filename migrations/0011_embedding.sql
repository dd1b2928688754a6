-- Embedding chatd in a product: users who come from the app's own identity provider.
-- depends: 0010_search_presence_push

-- A user known by the app's tokens (chatd/identity.py): the (iss, sub) of their JWTs.
-- Created on first sight with a users row of their own: no password ('!' verifies
-- nothing) and a placeholder email, since the app's email claim is never trusted to
-- link an identity to an existing account. `name` and `picture` are the claims last
-- applied: the profile is updated when the provider's values change, not on every token,
-- so a name changed in chatd stays until the provider's changes.
CREATE TABLE external_identities (
    issuer     text NOT NULL,
    subject    text NOT NULL,
    user_id    uuid NOT NULL UNIQUE REFERENCES users (id) ON DELETE CASCADE,
    name       text,
    picture    text,          -- the picture claim's URL, as given (chatd never fetches it)
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (issuer, subject)
);

-- The app API (chatd/handlers/app.py). An API key is an API token (0009_bots) of kind
-- 'app': a session of its own bot user, the key's identity, which owns the app's groups
-- and posts its system messages.
ALTER TABLE sessions DROP CONSTRAINT sessions_kind_check;
ALTER TABLE sessions
    ADD CONSTRAINT sessions_kind_check CHECK (kind IN ('login', 'bot', 'pat', 'app'));

-- The app's own id of a chat it created: POST /app/chats is idempotent by it, and a key
-- reaches only chats that have one.
ALTER TABLE chats ADD COLUMN ext_id text UNIQUE;

-- A key's webhook (chatd/app_hooks.py): the events it subscribed to, POSTed signed with
-- `secret` through the delivery queue (kind 'app_webhook', target this id).
CREATE TABLE app_webhooks (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_id     uuid NOT NULL UNIQUE REFERENCES api_tokens (id) ON DELETE CASCADE,
    url        text NOT NULL,
    secret     text NOT NULL,
    events     text[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
