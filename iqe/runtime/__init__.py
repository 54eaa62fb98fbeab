"""Files and DICOM -> preprocessing -> batches -> runner -> results (results.jsonl, maps.npz, overlays)."""
