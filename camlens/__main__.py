from camlens.cli import main

main()
