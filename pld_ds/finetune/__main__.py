from pld_ds.finetune.run import main

main()
