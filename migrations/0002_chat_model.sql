-- The chat model: member roles and join order, chat activity order for the chat list.
-- depends: 0001_initial

ALTER TABLE chat_members
    ADD COLUMN role text NOT NULL DEFAULT 'member' CHECK (role IN ('owner', 'admin', 'member')),
    -- "oldest admin / oldest member" when an owner leaves: insertion order, never tied.
    ADD COLUMN join_order bigint GENERATED ALWAYS AS IDENTITY;

-- Chats made before roles existed: their earliest member (the creator) owns them.
UPDATE chat_members cm SET role = 'owner'
FROM (
    SELECT DISTINCT ON (cm.chat_id) cm.chat_id, cm.user_id
    FROM chat_members cm JOIN chats c ON c.id = cm.chat_id AND c.type = 'group'
    ORDER BY cm.chat_id, cm.join_order
) creator
WHERE cm.chat_id = creator.chat_id AND cm.user_id = creator.user_id;

CREATE UNIQUE INDEX chat_members_one_owner_idx ON chat_members (chat_id) WHERE role = 'owner';

-- Position in the global activity order (creation, messages, members added, renames):
-- the chat list sorts by it and pages with it. A sequence, so it never ties.
CREATE SEQUENCE chat_activity_seq;
ALTER TABLE chats ADD COLUMN activity bigint;
WITH ranked AS (
    SELECT c.id, row_number() OVER (ORDER BY coalesce(max(m.created_at), c.created_at), c.id) AS n
    FROM chats c LEFT JOIN messages m ON m.chat_id = c.id
    GROUP BY c.id
)
UPDATE chats SET activity = ranked.n FROM ranked WHERE chats.id = ranked.id;
SELECT setval('chat_activity_seq', (SELECT count(*) + 1 FROM chats), false);
ALTER TABLE chats
    ALTER COLUMN activity SET DEFAULT nextval('chat_activity_seq'),
    ALTER COLUMN activity SET NOT NULL;
