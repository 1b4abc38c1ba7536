"""Where token verification keys come from when the policy names a URL rather than the key."""
