from paramtool.launch import main

main()
