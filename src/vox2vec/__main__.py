from vox2vec.cli import main

raise SystemExit(main())
