"""`python -m hetbatch.worker`: run one instance's worker against a coordinator."""

from hetbatch.worker.main import main

if __name__ == "__main__":
    main()
