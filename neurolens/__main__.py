from neurolens.cli import main

main()
