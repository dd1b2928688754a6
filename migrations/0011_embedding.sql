-- Embedding chatd in a product: users who come from the app's own identity provider.
-- depends: 0009_bots

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
