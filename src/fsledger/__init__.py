"""fsledger: keeps a database of every file in directory trees true to disk."""
