-- The durable delivery queue (chatd/deliveries.py): webhooks, Web Push and gateway
-- notifications are rows here, inserted in the transaction that commits what they tell,
-- and sent by any process's workers until delivered or dead.
-- depends: 0007_accounts

CREATE TABLE deliveries (
    id              bigserial PRIMARY KEY,
    kind            text NOT NULL,            -- which sender sends it: 'bot_webhook', ...
    target          bigint NOT NULL,          -- the kind's subscriber: a bot, a push subscription
    order_key       text NOT NULL,            -- one at a time, in id order, per key
    body            bytea NOT NULL,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    locked_until    timestamptz,              -- a worker's lease on its attempt
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);

-- The workers' two questions: what is due, and is it the oldest pending of its key.
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX deliveries_pending_order ON deliveries (order_key, id) WHERE state = 'pending';
-- Owners' listings (newest first) and the per-target cap.
CREATE INDEX deliveries_by_target ON deliveries (kind, target, id);
-- Retention.
CREATE INDEX deliveries_finished ON deliveries (finished_at) WHERE state <> 'pending';
