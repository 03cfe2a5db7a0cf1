"""The download engine (:mod:`.engine`): its plan, the parts and their verification, the
resume journal and sidecar file, the sources of a part's bytes (presigned GETs received by
worker threads), adaptive streams and ETag checks."""
