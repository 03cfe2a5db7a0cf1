"""Object stores: the ``ObjectStore`` protocol (:mod:`.base`), the local, S3/R2 and HTTP(S)
stores, and what they need (store URLs, SigV4 presigning, the request throttle, checked S3
answer fields)."""
