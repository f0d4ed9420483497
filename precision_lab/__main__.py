from precision_lab.cli import main

main()
