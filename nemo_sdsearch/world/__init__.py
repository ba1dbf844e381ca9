"""The bundled synthetic world: entities, passages (Search-R1 corpus format), questions (FlashRAG format)."""
