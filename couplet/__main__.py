from couplet.cli import main

main()
