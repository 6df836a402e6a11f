"""mmkd's test-only plugin package: cheap workloads for wiring, resume and failure tests
(``debug``), the real training loop on generated rows (``debug_train``), and data/tokenizer
fixtures. Installed beside mmkd by ``scripts/test.sh``; a normal install never sees it."""
