"""Bundled architecture configs (Hugging Face `config.json` shape fields) so estimates work offline."""
