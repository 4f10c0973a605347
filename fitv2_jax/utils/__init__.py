"""Small shared pieces: user-facing errors, atomic files, timing."""
