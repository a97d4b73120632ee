"""Phase 1 execution: KasminaLayer, its seed slots and their fault handling."""
