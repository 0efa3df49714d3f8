from weightstore.cli import main

main()
