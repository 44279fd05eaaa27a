from paramtool.cli import main

main()
