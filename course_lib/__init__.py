"""course_lib: the code behind the Week 4 notebooks on data poisoning and backdoor attacks."""
__version__ = "0.1.0"
