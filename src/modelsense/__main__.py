from modelsense.cli import main

main()
