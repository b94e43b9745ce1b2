from deploybus.cli import main

main()
