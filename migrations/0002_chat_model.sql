-- The chat model: member roles and join order, chat activity order for the chat list.
-- depends: 0001_initial

ALTER TABLE chat_members
    ADD COLUMN role text NOT NULL DEFAULT 'member' CHECK (role IN ('owner', 'admin', 'member')),
    ADD COLUMN join_order bigint;

-- Existing members: 0001 put a chat's creator and first members in one transaction, so
-- joined_at ties; among them, whoever sent first counts as older (the creator, usually).
WITH ranked AS (
    SELECT cm.chat_id, cm.user_id,
           row_number() OVER (
               ORDER BY cm.joined_at,
                        (SELECT min(m.seq) FROM messages m
                         WHERE m.chat_id = cm.chat_id AND m.sender_id = cm.user_id) NULLS LAST,
                        cm.user_id
           ) AS n
    FROM chat_members cm
)
UPDATE chat_members cm SET join_order = ranked.n
FROM ranked WHERE cm.chat_id = ranked.chat_id AND cm.user_id = ranked.user_id;

-- From now on: insertion order, never tied ("oldest admin / oldest member" on leave).
ALTER TABLE chat_members
    ALTER COLUMN join_order SET NOT NULL,
    ALTER COLUMN join_order ADD GENERATED ALWAYS AS IDENTITY;
-- (setval through CREATE TABLE AS: a bare SELECT would print its result at every migrate.)
CREATE TEMPORARY TABLE chatd_0002_setval AS
SELECT setval(pg_get_serial_sequence('chat_members', 'join_order'),
              (SELECT coalesce(max(join_order), 0) + 1 FROM chat_members), false);
DROP TABLE chatd_0002_setval;

-- Groups made before roles existed: their oldest member owns them.
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
ALTER TABLE chats ADD COLUMN activity bigint;
CREATE SEQUENCE chat_activity_seq OWNED BY chats.activity;
WITH ranked AS (
    SELECT c.id, row_number() OVER (ORDER BY coalesce(max(m.created_at), c.created_at), c.id) AS n
    FROM chats c LEFT JOIN messages m ON m.chat_id = c.id
    GROUP BY c.id
)
UPDATE chats SET activity = ranked.n FROM ranked WHERE chats.id = ranked.id;
CREATE TEMPORARY TABLE chatd_0002_setval AS
SELECT setval('chat_activity_seq', (SELECT count(*) + 1 FROM chats), false);
DROP TABLE chatd_0002_setval;
ALTER TABLE chats
    ALTER COLUMN activity SET DEFAULT nextval('chat_activity_seq'),
    ALTER COLUMN activity SET NOT NULL;
