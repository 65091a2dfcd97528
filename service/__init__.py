"""FreeClimb call-status processor: verified webhooks in, legal call-state changes out."""
