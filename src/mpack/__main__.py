from mpack.cli import main

main()
