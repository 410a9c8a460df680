"""Files and transport: the Hub, outputs written atomically, safetensors patched in place."""
