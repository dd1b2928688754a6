-- Bots and integrations: bot accounts, API tokens (bot tokens and personal access tokens),
-- slash commands, outgoing webhooks of bots and incoming webhooks of chats.
-- depends: 0008_deliveries

-- A bot is a user (it joins chats, sends, is a member) flagged is_bot. It has no password
-- (password_hash '!', which no password verifies) and a placeholder email.
ALTER TABLE users ADD COLUMN is_bot boolean NOT NULL DEFAULT false;

-- The bots made with POST /bots: their owner, handle, commands and webhook. (The bot
-- identities of incoming webhooks are users with is_bot but no row here.)
CREATE TABLE bots (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id        uuid NOT NULL UNIQUE REFERENCES users (id) ON DELETE CASCADE,
    owner_id       uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    username       text NOT NULL UNIQUE,            -- lower-cased [a-z][a-z0-9_]{2,31}
    commands       jsonb NOT NULL DEFAULT '[]',     -- [{"name", "description"}]
    webhook_url    text,                            -- NULL: socket mode only
    webhook_secret text,                            -- the HMAC key of its deliveries
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX bots_owner_idx ON bots (owner_id, id);

-- An API token (a bot's token or a personal access token) is a session of its user, so
-- revoking it is revoking a session: the SessionCache forgets it and its sockets close.
ALTER TABLE sessions
    ADD COLUMN kind text NOT NULL DEFAULT 'login' CHECK (kind IN ('login', 'bot', 'pat'));

CREATE TABLE api_tokens (
    id         uuid PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name       text NOT NULL,
    scopes     text[] NOT NULL,                     -- {read} or {read,write}
    token_hash bytea NOT NULL UNIQUE,               -- sha256 of the token; never the token
    expires_at timestamptz                          -- NULL: until revoked
);
CREATE INDEX api_tokens_user_idx ON api_tokens (user_id);

-- How many bots are members of each chat (`bots`), and how many of those have a webhook
-- (`hooks`), kept by a trigger and by PATCH /bots (which recounts the bot's chats). The
-- MessageWriter reads both with the chat lock it takes anyway: a chat without bots costs
-- the send path no query, and one whose bots hold sockets only costs one for a "/" text.
ALTER TABLE chats
    ADD COLUMN bots integer NOT NULL DEFAULT 0,
    ADD COLUMN hooks integer NOT NULL DEFAULT 0;

CREATE FUNCTION chatd_count_bot_members() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    member uuid := CASE WHEN TG_OP = 'INSERT' THEN NEW.user_id ELSE OLD.user_id END;
    chat bigint := CASE WHEN TG_OP = 'INSERT' THEN NEW.chat_id ELSE OLD.chat_id END;
    step integer := CASE WHEN TG_OP = 'INSERT' THEN 1 ELSE -1 END;
    hooked boolean;
BEGIN
    IF (SELECT is_bot FROM users WHERE id = member) THEN
        -- FOR SHARE: waits for a PATCH /bots changing the webhook, then reads its result
        -- (which recounts the chats the bot was in when it looked).
        SELECT webhook_url IS NOT NULL INTO hooked FROM bots WHERE user_id = member FOR SHARE;
        UPDATE chats
        SET bots = greatest(bots + step, 0),
            hooks = greatest(hooks + CASE WHEN coalesce(hooked, false) THEN step ELSE 0 END, 0)
        WHERE id = chat;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER chat_members_count_bots
AFTER INSERT OR DELETE ON chat_members
FOR EACH ROW EXECUTE FUNCTION chatd_count_bot_members();

-- POST /chats/{id}/webhooks: an incoming webhook posts into its chat as its own bot user.
CREATE TABLE chat_webhooks (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chat_id     bigint NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    bot_user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    creator_id  uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name        text NOT NULL,
    secret_hash bytea NOT NULL,                     -- sha256 of the URL's secret
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX chat_webhooks_chat_idx ON chat_webhooks (chat_id, id);
