"""The W8A8_MIX checkpoint: names, description json, reading, writing, validation (SPEC §2-§3)."""
