"""Policy: the YAML security teams edit, validated into frozen objects and swapped atomically."""
