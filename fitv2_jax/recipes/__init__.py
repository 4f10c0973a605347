"""End-to-end workflows composed from the library (the CPU demo)."""
