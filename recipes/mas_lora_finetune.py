print(__name__, "hello")
