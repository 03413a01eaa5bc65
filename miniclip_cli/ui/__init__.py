"""Rich progress, tables and plotext charts: numbers in, text out."""
