from robustlogits.cli.app import main

main()
