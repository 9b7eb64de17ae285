"""Reports: aggregate per-run metrics into a tidy frame, render tables (Markdown/CSV) and figures (PNG)."""
