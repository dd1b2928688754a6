-- Files: uploads, their bytes (content-addressed blobs), and what refers to them.
-- depends: 0005_message_lifecycle

-- Bytes, stored once per content in the file store (chatd/files.py) under their sha256.
-- `touched_at` is renewed by every upload of the same bytes before it writes them, so the
-- collector, which only takes blobs untouched for a grace period, never deletes bytes an
-- upload is about to refer to.
CREATE TABLE blobs (
    sha256     text PRIMARY KEY,
    size       bigint NOT NULL,
    touched_at timestamptz NOT NULL DEFAULT now()
);

-- One upload: who sent it, what it is. Its bytes and its thumbnail's are blobs.
-- owner_id goes NULL when the account goes: messages may still carry the file.
CREATE TABLE files (
    id           uuid PRIMARY KEY,
    owner_id     uuid REFERENCES users (id) ON DELETE SET NULL,
    sha256       text NOT NULL REFERENCES blobs (sha256),
    thumb_sha256 text REFERENCES blobs (sha256),
    name         text NOT NULL,
    mime         text NOT NULL,
    size         bigint NOT NULL,
    width        integer,
    height       integer,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- Last attached to something (a message, an avatar, a photo); NULL: never. The
    -- collector spares a file for a grace period after this, so a send in flight keeps it.
    claimed_at   timestamptz
);
CREATE INDEX files_owner_idx ON files (owner_id, created_at);
CREATE INDEX files_sha256_idx ON files (sha256);
CREATE INDEX files_thumb_sha256_idx ON files (thumb_sha256) WHERE thumb_sha256 IS NOT NULL;

-- A message's attachments, in order: what authorizes a download, and what keeps a file.
-- (messages.attachments holds the same list as the wire shows it, so reads never join.)
CREATE TABLE message_files (
    message_id bigint NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    position   smallint NOT NULL,
    file_id    uuid NOT NULL REFERENCES files (id),
    PRIMARY KEY (message_id, position)
);
CREATE INDEX message_files_file_idx ON message_files (file_id);

ALTER TABLE messages ADD COLUMN attachments jsonb;

ALTER TABLE users ADD COLUMN avatar uuid REFERENCES files (id);
CREATE INDEX users_avatar_idx ON users (avatar) WHERE avatar IS NOT NULL;
ALTER TABLE chats ADD COLUMN photo uuid REFERENCES files (id);
CREATE INDEX chats_photo_idx ON chats (photo) WHERE photo IS NOT NULL;
