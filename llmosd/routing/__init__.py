"""Where a request goes when this box should not answer it: LAN peers and an OpenAI-compatible upstream
(``router``), by the per-model policy of ``policy`` (which the config imports, so this file imports
nothing)."""
