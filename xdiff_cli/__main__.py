from xdiff_cli.cli import main

main()
