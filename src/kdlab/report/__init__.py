"""Reports: tables (markdown/CSV/HTML) and plots from finished run directories."""
