from cfedit.cli import main

main()
