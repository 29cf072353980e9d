from .arguments import main

raise SystemExit(main())
