-- The sender's index only over messages not deleted for everyone: every query that reads
-- it says NOT deleted (GET /me/export's pages, erasing a user's messages).
-- depends: 0011_embedding
--
-- Why: a connection plans its statements once and keeps the plan until PostgreSQL next
-- analyzes the table. Planned while `messages` was empty (a new deployment, a fresh
-- database), a send's retry lookup, (sender_id, client_msg_id) = (...), chose this index
-- over the unique key, and so walked every message of the sender on every send: the
-- cost of a send grew with its sender's messages until the first autovacuum analyze.
-- The retry lookups count deleted messages too, so this index cannot serve them now.
DROP INDEX messages_sender_idx;
CREATE INDEX messages_sender_idx ON messages (sender_id, id) WHERE NOT deleted;
