"""The `nectar` command: its arguments (main), what each command does (commands), and what it prints about a
compiled document (summary). Nothing below imports from here."""
