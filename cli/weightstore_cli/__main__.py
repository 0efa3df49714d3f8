from weightstore_cli import main

main()
