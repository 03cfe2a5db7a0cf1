"""Object stores (R2/S3, local directory), the transfer engine, retries and throttling."""
